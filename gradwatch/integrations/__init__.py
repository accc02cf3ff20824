"""Framework adapters: one module per framework, each importing its framework only inside it.

- `gradwatch.integrations.lightning`: `GradwatchCallback` for `lightning.Trainer`.
- `gradwatch.integrations.hf`: `GradwatchCallback` for Hugging Face's `transformers.Trainer`.
- `gradwatch.integrations.launch`: what `gradwatch run` loads into the training process to
  attach without changes to the script.

Importing this package imports no framework; docs/integrations.md has an example for each.
"""
