"""The PyTorch reference and the parity suite (imports torch; kdjax never imports this)."""
