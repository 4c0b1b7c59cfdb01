"""Training support for the Twig demo model: generated scene dataset, tiny tokenizer, programmatic evaluator."""
