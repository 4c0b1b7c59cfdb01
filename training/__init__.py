"""The demo model's training recipe (``python -m training demo``): generated scene dataset, tiny tokenizer, the
trainer's stages, programmatic evaluator. Uses ``twig_core`` as a library; the runtime never imports it."""
