"""Inference: loading a pipeline with a merged adapter, generating images with a manifest, the generation CLI."""
