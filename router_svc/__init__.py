"""The router: public Inference API, registry view, routing policy (pure) and the client library."""
