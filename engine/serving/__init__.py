"""What prefill and decode workers share around their Engine: settings,
registration in etcd, admission (drain and backpressure), load reports, and
the process lifecycle. prefill_svc and decode_svc add only their servicers."""
