"""Quality: the metrics, the evaluator classifier and its cache, the server's judge."""
