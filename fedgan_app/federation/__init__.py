"""Federation: the ClientApp, the server's strategy wrappers, sampling, weights, cores."""
