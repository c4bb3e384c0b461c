"""The worker process that prefill_svc and decode_svc share around their
Engine: settings, registration in etcd with GPU claims, drain, admission
(backpressure), the load stream, metrics and the process lifecycle. The two
services add only their servicers."""
