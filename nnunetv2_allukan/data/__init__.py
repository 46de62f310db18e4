"""Dataset builders: nnU-Net raw datasets from brain templates shipped in PyPI wheels (``templates``) and
synthetic test data (``synthetic``). They write files only; they know nothing of the commands or of nnU-Net's
code, so the tools and the tests can both use them."""
