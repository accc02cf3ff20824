"""The folder `gradwatch run` puts first on the child's PYTHONPATH, for its `sitecustomize`."""
