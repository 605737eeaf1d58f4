"""Where a run's inputs come from: a model folder or a Hub id, and the calibration text as token windows."""
