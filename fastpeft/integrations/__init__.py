"""Patching other frameworks' models (PEFT, transformers, bitsandbytes, AdapterHub) to run fastpeft ops."""
