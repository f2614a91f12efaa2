// A Flameup Events client over gRPC: the generated service descriptor
// (src/gen, from clients/buf.gen.typescript.yaml) called through
// @connectrpc/connect-node, with the API key sent on every call.
import { type Client, ConnectError, type Interceptor, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { EventsService } from "./gen/flameup/events/v1/events_pb.js";
import { type BadRequest_FieldViolation, BadRequestSchema } from "./gen/google/rpc/error_details_pb.js";

export type EventsClient = Client<typeof EventsService>;

/** A client of the gRPC API at baseUrl (e.g. "http://127.0.0.1:50051"). */
export function createEventsClient(baseUrl: string, apiKey: string): EventsClient {
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${apiKey}`);
    return next(req);
  };
  return createClient(EventsService, createGrpcTransport({ baseUrl, interceptors: [auth] }));
}

/** The field violations of an INVALID_ARGUMENT error (its google.rpc.BadRequest detail). */
export function fieldViolations(err: unknown): BadRequest_FieldViolation[] {
  return ConnectError.from(err).findDetails(BadRequestSchema).flatMap((detail) => detail.fieldViolations);
}
