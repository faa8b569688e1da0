"""Data for training and checking adapters: the synthetic shapes dataset, the caption
tokenizer built from its words, and loaders for user caption datasets (COCO JSON, JSONL)."""
