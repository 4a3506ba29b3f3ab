"""Autonomous goals: PromQL trend queries open goals before thresholds break, and the planner works them."""
