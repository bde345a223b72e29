/*
 * follow: a Kuma feed consumer in C, with nothing but the NATS C client
 * (libnats) and a JSON parser (cJSON), both Debian packages:
 *
 *   apt-get install libnats-dev libcjson-dev
 *   cc -o follow follow.c -lnats -lcjson
 *   ./follow nats://127.0.0.1:4222 default [CURSOR_FILE]
 *
 * It long-polls kuma.<ctx>.feed (PROTOCOL.md, feed): catch-up from the
 * cursor, then live. Every event is printed as one line
 *   <position> <entity> v<version> <type> <data as JSON>
 * and after every page the reply's "next" is written to CURSOR_FILE, so a
 * restarted follow resumes where it stopped. The cursor is opaque: it is
 * stored and sent back, never parsed. With KUMA_FOLLOW_UNTIL_IDLE=1 it
 * exits when a page comes back empty (caught up), for scripts and tests.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <nats/nats.h>

static char *read_cursor(const char *path) {
    FILE *f;
    char buf[4096];
    size_t n;
    if (path == NULL || (f = fopen(path, "r")) == NULL)
        return NULL;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        n--;
    buf[n] = '\0';
    return n > 0 ? strdup(buf) : NULL;
}

/* write_cursor replaces the file through a rename, so a crash leaves the
 * old checkpoint or the new one. */
static int write_cursor(const char *path, const char *cursor) {
    char tmp[4096];
    FILE *f;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if ((f = fopen(tmp, "w")) == NULL)
        return -1;
    fprintf(f, "%s\n", cursor);
    if (fclose(f) != 0)
        return -1;
    return rename(tmp, path);
}

int main(int argc, char **argv) {
    const char *url = argc > 1 ? argv[1] : "nats://127.0.0.1:4222";
    const char *ctx = argc > 2 ? argv[2] : "default";
    const char *cursor_file = argc > 3 ? argv[3] : NULL;
    int until_idle = getenv("KUMA_FOLLOW_UNTIL_IDLE") != NULL;
    char subject[128];
    char *cursor = read_cursor(cursor_file);
    natsConnection *nc = NULL;
    natsStatus s;

    snprintf(subject, sizeof subject, "kuma.%s.feed", ctx);
    if ((s = natsConnection_ConnectTo(&nc, url)) != NATS_OK) {
        fprintf(stderr, "follow: connect to %s: %s\n", url, natsStatus_GetText(s));
        return 1;
    }
    for (;;) {
        cJSON *req = cJSON_CreateObject(), *reply, *events, *ev, *next, *err;
        natsMsg *msg = NULL;
        char *body;
        cJSON_AddNumberToObject(req, "limit", 100);
        cJSON_AddNumberToObject(req, "wait_ms", until_idle ? 0 : 10000);
        if (cursor != NULL)
            cJSON_AddStringToObject(req, "after", cursor);
        body = cJSON_PrintUnformatted(req);
        cJSON_Delete(req);
        s = natsConnection_RequestString(&msg, nc, subject, body, 15000);
        free(body);
        if (s == NATS_TIMEOUT || s == NATS_NO_RESPONDERS) {
            continue; /* Kuma restarting or moving a shard: ask again */
        }
        if (s != NATS_OK) {
            fprintf(stderr, "follow: request: %s\n", natsStatus_GetText(s));
            return 1;
        }
        reply = cJSON_ParseWithLength(natsMsg_GetData(msg), natsMsg_GetDataLength(msg));
        natsMsg_Destroy(msg);
        if (reply == NULL) {
            fprintf(stderr, "follow: the reply is not JSON\n");
            return 1;
        }
        if ((err = cJSON_GetObjectItemCaseSensitive(reply, "error")) != NULL) {
            cJSON *code = cJSON_GetObjectItemCaseSensitive(err, "code");
            cJSON *text = cJSON_GetObjectItemCaseSensitive(err, "message");
            if (cJSON_IsString(code) && strcmp(code->valuestring, "unavailable") == 0) {
                cJSON_Delete(reply);
                continue; /* safe to retry */
            }
            fprintf(stderr, "follow: %s: %s\n", cJSON_IsString(code) ? code->valuestring : "?",
                    cJSON_IsString(text) ? text->valuestring : "");
            cJSON_Delete(reply);
            return 1;
        }
        events = cJSON_GetObjectItemCaseSensitive(reply, "events");
        cJSON_ArrayForEach(ev, events) {
            cJSON *data = cJSON_GetObjectItemCaseSensitive(ev, "data");
            char *d = cJSON_PrintUnformatted(data);
            printf("%s %s v%.0f %s %s\n",
                   cJSON_GetObjectItemCaseSensitive(ev, "position")->valuestring,
                   cJSON_GetObjectItemCaseSensitive(ev, "entity")->valuestring,
                   cJSON_GetObjectItemCaseSensitive(ev, "version")->valuedouble,
                   cJSON_GetObjectItemCaseSensitive(ev, "type")->valuestring, d);
            free(d);
        }
        fflush(stdout);
        next = cJSON_GetObjectItemCaseSensitive(reply, "next");
        if (cJSON_IsString(next) && (cursor == NULL || strcmp(cursor, next->valuestring) != 0)) {
            free(cursor);
            cursor = strdup(next->valuestring);
            if (cursor_file != NULL && write_cursor(cursor_file, cursor) != 0) {
                perror("follow: write the cursor");
                return 1;
            }
        }
        if (until_idle && cJSON_GetArraySize(events) == 0) {
            cJSON_Delete(reply);
            break;
        }
        cJSON_Delete(reply);
    }
    free(cursor);
    natsConnection_Destroy(nc);
    return 0;
}
