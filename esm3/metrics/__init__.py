"""esm3/metrics"""
