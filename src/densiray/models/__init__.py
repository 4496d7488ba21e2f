"""The model families in plain PyTorch (no Ray here); each family's loader of exported models lives beside it."""
