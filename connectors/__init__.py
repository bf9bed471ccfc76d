"""Engine connectors for kvbm (installed as ``kvbm.connectors``)."""
