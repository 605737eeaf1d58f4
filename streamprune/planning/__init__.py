"""Planning, from headers only: memory, disk and time of a run (plan, timing, advice and its
rendering), the checks made before any work (validate), inspect, and the survey's previews."""
