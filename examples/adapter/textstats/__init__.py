"""An example Snakepit adapter: text statistics, with a per-session corpus."""
