"""The registry in etcd: the one client module (etcd_client), every key path
(keys), typed versioned records (records), lease sessions (session), GPU
claims (claims), intents and model specs (store), leader election (election),
the watched view (view), and the routable rule routers and the control plane
share (routable, routable_pb)."""
