"""sparsetrain.pruning"""
