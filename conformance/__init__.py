"""critest against a real kvmsandbox server: its images, its skip list and its runner."""
