"""esm3/train"""
