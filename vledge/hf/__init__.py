"""Hugging Face folders in, vledge checkpoints out: one import path for plain LM folders, vision towers and LLaVA
folders; what a config and its tensor names mean is each family's business (``vledge.families``)."""
