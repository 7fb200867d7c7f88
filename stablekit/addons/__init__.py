"""Add-ons people bring as extra files and apply to a loaded model (LoRA / LyCORIS in `lora`, ...).

Each add-on works on a `stablekit.models.StableDiffusionModel` through its parameter names
(the original checkpoint keys), so it needs nothing from the engine and can be tested alone.
"""
