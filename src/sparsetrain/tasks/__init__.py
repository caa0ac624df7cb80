"""sparsetrain.tasks"""
