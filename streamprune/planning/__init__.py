"""Planning, from headers only: memory, disk and time of a run (plan, timing), will it fit and
what would (advice), and inspect's description of the model and the fixed rule's cut."""
