"""esm3/tasks"""
