"""The generation loop: requests, scheduling, the paged KV blocks, stopping, and the asyncio front."""
