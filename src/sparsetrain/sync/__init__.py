"""sparsetrain.sync"""
