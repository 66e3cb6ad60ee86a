"""What an operator runs and a node never imports: the load tester, the local cluster, the
demo, the jobs view and the embedded PostgreSQL."""
