"""The pipeline classes model_index.json's "_class_name" names, for diffusers:
diffusers.DiffusionPipeline.from_pretrained(this folder, trust_remote_code=True) imports them from here (vartk must be
installed). vartk.load(folder) does not run this file."""
from vartk.pipelines import GPTPipeline, VARPipeline  # noqa: F401
