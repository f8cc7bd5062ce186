"""(family module; filled in by its issue)"""
