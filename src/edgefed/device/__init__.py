"""One device's side of a federation: its workspace, and its part in each round."""
