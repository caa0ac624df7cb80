"""sparsetrain.robust"""
