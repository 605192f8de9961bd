"""The kubelet's gRPC messages for the DRA driver: our own .proto files beside the modules protoc made
from them (``make protos`` regenerates them; they are committed so that installing needs no protoc)."""
