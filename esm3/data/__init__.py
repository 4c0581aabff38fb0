"""esm3/data"""
