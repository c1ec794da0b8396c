//! HTTP admin API and Prometheus endpoint.
