from jaxdec.cache.kv import KVCache, append, rollback, gather_block, check_room, bucket, swap_heads_slots

__all__ = ["KVCache", "append", "rollback", "gather_block", "check_room", "bucket", "swap_heads_slots"]
