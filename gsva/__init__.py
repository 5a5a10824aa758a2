"""GSVA: generalized referring segmentation with a multimodal LLM and SAM (model code; never imports Ray)."""
