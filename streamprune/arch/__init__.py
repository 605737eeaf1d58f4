"""The model's description: its config and shapes (spec, families), where its tensors live
(model), the config a cut writes (output_config), Hub ids (hub), and its tokenizer's view of a
text (calibration)."""
