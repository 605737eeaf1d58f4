"""What the commands print: the plan, the model's description, the survey's previews, as lines of text."""
