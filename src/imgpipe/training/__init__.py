"""Training: strategies, resume, devices, the loop."""
