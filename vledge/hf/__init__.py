"""Reading local Hugging Face folders (config.json + safetensors) into vledge configs and weights."""
