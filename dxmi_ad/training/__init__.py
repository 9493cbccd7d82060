"""Training: the DxDP update, the stage schedule, the whole run, and Fabric execution."""
