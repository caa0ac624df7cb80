"""sparsetrain.cluster"""
