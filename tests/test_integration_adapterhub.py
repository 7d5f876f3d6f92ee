"""fastpeft against AdapterHub's ``adapters`` (1.3, transformers ~4.57): its environment is separate from the
main one (``make test-adapterhub``); these tests skip where ``adapters`` is absent.

AdapterHub's models patched by ``patch_adapterhub_model`` give AdapterHub's numbers, and adapters saved by
AdapterHub load into a plain transformers model through ``fastpeft.add_bottleneck_adapters``'s placements with
AdapterHub's numbers, for seq_bn, double_seq_bn and par_bn on BERT and Llama."""

from __future__ import annotations

import pytest
import torch

adapters = pytest.importorskip("adapters")
transformers = pytest.importorskip("transformers")

from conftest import rel_error  # noqa: E402

from fastpeft.integrations.adapterhub import patch_adapterhub_model  # noqa: E402
from fastpeft.integrations.bottleneck_checkpoint import load_bottleneck_adapter  # noqa: E402

CONFIGS = ["seq_bn", "double_seq_bn", "par_bn"]


def base_model(family: str):
    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=60, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=96, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)  # fmt: skip
        return transformers.BertModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=60, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return transformers.LlamaModel(config).eval()


def hub_model(family: str, config: str):
    model = base_model(family)
    adapters.init(model)
    model.add_adapter("hub", config=config)
    model.set_active_adapters("hub")
    with torch.no_grad():  # random weights: at initialisation an adapter is (near) the identity
        for name, param in model.named_parameters():
            if ".adapters.hub." in name:
                param.normal_(0.0, 0.2).add_(1.0 if name.endswith("scaling") else 0.0)
    return model.eval()


def run(model):
    ids = torch.randint(0, 60, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).last_hidden_state


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_patched_adapterhub_model_gives_adapterhubs_numbers(family, config):
    model = hub_model(family, config)
    reference = run(model)
    assert patch_adapterhub_model(model) == len([n for n, _ in model.named_modules() if n.endswith(".hub")])
    assert rel_error(run(model), reference) < 1e-5


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_adapters_saved_by_adapterhub_load_with_its_numbers(tmp_path, family, config):
    model = hub_model(family, config)
    reference = run(model)
    model.save_adapter(str(tmp_path), "hub")
    plain = base_model(family)
    assert load_bottleneck_adapter(plain, tmp_path) == "hub"
    assert rel_error(run(plain), reference) < 1e-5
    assert rel_error(run(plain), run(base_model(family))) > 1e-3  # the adapters do change the output


def test_what_adapterhub_has_not_prepared_is_refused_by_name():
    from fastpeft.integrations.adapterhub import explain_adapterhub_patch

    for model in (base_model("bert"), torch.nn.Linear(4, 4)):
        for function in (patch_adapterhub_model, explain_adapterhub_patch):
            with pytest.raises(
                TypeError, match=f"{function.__name__} expects an AdapterHub model.*{type(model).__name__}"
            ):
                function(model)
    prepared = base_model("bert")
    adapters.init(prepared)  # prepared, no adapter yet: nothing to patch, and no error
    assert patch_adapterhub_model(prepared) == 0
