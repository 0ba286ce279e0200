"""The workload service: a plan plus ready nodes become a running workload (Ray Serve application or
tuning job); its readiness is reported back."""
