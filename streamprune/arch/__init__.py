"""The model's description: its config and shapes (spec, families), where its tensors live
(model), the config a cut writes (output_config)."""
