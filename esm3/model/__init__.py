"""esm3/model"""
