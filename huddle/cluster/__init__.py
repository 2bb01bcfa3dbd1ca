"""The cluster: placement of calls over nodes by chat id, membership (single node, workers, ZooKeeper)."""
